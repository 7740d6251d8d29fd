-- The device kind a job must run on (`cpu`, `cuda`, …); NULL lets any worker claim it.
-- Workers claim only jobs their device can run, so a job that needs a GPU is never
-- taken by the CPU worker. Keep in step with ../postgres/0002_job_device_kind.sql.
ALTER TABLE jobs ADD COLUMN device_kind TEXT;
