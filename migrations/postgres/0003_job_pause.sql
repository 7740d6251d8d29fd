-- Pause: set on a job the user paused (unix s). A paused job keeps status 'queued' once
-- its worker has checkpointed and let go, and claims skip it until it is resumed; on a
-- running job it asks the worker to pause (seen through the heartbeat). The API reports
-- such a queued job as 'paused'. Keep in step with ../sqlite/0003_job_pause.sql.
ALTER TABLE jobs ADD COLUMN paused_at BIGINT;
