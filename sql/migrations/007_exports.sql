-- Exports (GGUF, merged HF, PEFT) and the evaluations that score them in their runtime.
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS runtime VARCHAR;
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS export_key VARCHAR;
CREATE TABLE IF NOT EXISTS exports (
    export_key        VARCHAR PRIMARY KEY,
    model             VARCHAR NOT NULL,
    method            VARCHAR NOT NULL,
    budget            DOUBLE,
    plan_id           VARCHAR NOT NULL,
    run_key           VARCHAR NOT NULL,
    format            VARCHAR NOT NULL,
    path              VARCHAR NOT NULL,
    file_bytes        BIGINT NOT NULL,
    sha256            VARCHAR NOT NULL,
    target_bits       DOUBLE,
    objective         DOUBLE,
    notes             VARCHAR,
    created_at        TIMESTAMP DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS export_tensors (
    export_key  VARCHAR NOT NULL,
    tensor      VARCHAR NOT NULL,
    type        VARCHAR NOT NULL,
    numel       BIGINT NOT NULL,
    nbytes      BIGINT NOT NULL,
    is_target   BOOLEAN NOT NULL,
    error       DOUBLE,
    PRIMARY KEY (export_key, tensor)
);
