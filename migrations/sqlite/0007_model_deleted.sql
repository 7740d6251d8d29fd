-- DELETE /v1/models/{fine_tuned_model}: when the job's fine-tuned model was deleted (unix
-- s). The model is no longer listed or served; the job, its files and checkpoints stay
-- until deleted themselves. Keep in step with ../postgres/0007_model_deleted.sql.
ALTER TABLE jobs ADD COLUMN model_deleted_at INTEGER;
