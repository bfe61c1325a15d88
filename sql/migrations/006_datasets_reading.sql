-- How a dataset's bytes were read: JSON {encoding, skip_unreadable, skipped} (NULL: UTF-8, every file).
ALTER TABLE datasets ADD COLUMN IF NOT EXISTS reading VARCHAR;
