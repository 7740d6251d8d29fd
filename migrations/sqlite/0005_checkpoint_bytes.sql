-- The bytes a checkpoint keeps in the blob store (its files and its zip), so that an
-- owner's storage quota counts checkpoints as well as files. 0 for checkpoints saved
-- before this was recorded. Keep in step with ../postgres/0005_checkpoint_bytes.sql.
ALTER TABLE checkpoints ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
