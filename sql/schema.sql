-- lqlora-dagster warehouse: the system of record for everything tabular.
-- One DuckDB file under LQLORA_HOME. Every table is keyed so that rewriting a
-- result replaces its rows (idempotent re-runs, no duplicates after a crash).
-- Config columns: b (weight bits), b0 (scale-code bits), b1 (scale format), and the
-- paper's B0 and B1 as block_size and group_size (DuckDB names are case-insensitive,
-- so "B0" would collide with b0).
--
-- This file is every table at its current shape: a new home gets it whole. A home made by
-- older code gets the columns it lacks from sql/migrations/NNN_what.sql, applied once each
-- in order and recorded in schema_migrations (Warehouse.init_schema). To change a table:
-- change it here (a new column goes last) and add the next numbered migration that brings an
-- older table to the same shape while leaving a current one as it is (ADD COLUMN IF NOT
-- EXISTS); tests/store/test_migrations.py checks that both paths give the same tables.

CREATE TABLE IF NOT EXISTS schema_migrations (
    version     INTEGER PRIMARY KEY,      -- NNN of sql/migrations/NNN_name.sql
    name        VARCHAR NOT NULL,
    applied_at  TIMESTAMP NOT NULL
);

CREATE TABLE IF NOT EXISTS models (
    model          VARCHAR PRIMARY KEY,   -- the Dagster partition key
    source         VARCHAR NOT NULL,      -- bundled name or local folder
    task           VARCHAR NOT NULL,      -- causal-lm | seq-cls
    pattern        VARCHAR,               -- target-module regex (NULL: architecture default)
    registered_at  TIMESTAMP DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS datasets (
    name      VARCHAR PRIMARY KEY,        -- `lqlora data add NAME PATH`
    path      VARCHAR NOT NULL,           -- the file or folder, absolute
    format    VARCHAR NOT NULL,           -- txt | txt-folder | jsonl | json | csv | parquet
    task      VARCHAR NOT NULL,           -- lm | instruct | classify
    rows      BIGINT NOT NULL,
    columns   VARCHAR NOT NULL,           -- JSON list of the file's columns
    sha256    VARCHAR NOT NULL,           -- of the bytes; part of every content key downstream
    use       VARCHAR NOT NULL,           -- JSON {role: column}: which column is text, label, prompt, ...
    labels    VARCHAR NOT NULL,           -- JSON list (classify): the head's output order
    added_at  TIMESTAMP DEFAULT current_timestamp,
    reading   VARCHAR                     -- JSON {encoding, skip_unreadable, skipped}: how the
                                          -- bytes were read (NULL: UTF-8, every file)
);

CREATE TABLE IF NOT EXISTS matrices (
    model    VARCHAR NOT NULL,
    name     VARCHAR NOT NULL,            -- module path of the target layer
    kind     VARCHAR NOT NULL,            -- q_proj, down_proj, query, ...
    layer    INTEGER NOT NULL,
    rows     INTEGER NOT NULL,
    cols     INTEGER NOT NULL,
    numel    BIGINT NOT NULL,
    transposed BOOLEAN NOT NULL,          -- stored (in, out), e.g. GPT-2 Conv1D
    position INTEGER NOT NULL,            -- order of the module in the model
    PRIMARY KEY (model, name)
);

CREATE TABLE IF NOT EXISTS calibration (
    key          VARCHAR PRIMARY KEY,
    model        VARCHAR NOT NULL,
    text         VARCHAR NOT NULL,
    n_sequences  INTEGER NOT NULL,
    seq_len      INTEGER NOT NULL,
    path         VARCHAR NOT NULL,
    created_at   TIMESTAMP DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS fisher_stats (
    key     VARCHAR NOT NULL,
    model   VARCHAR NOT NULL,
    matrix  VARCHAR NOT NULL,
    mean    DOUBLE NOT NULL,
    max     DOUBLE NOT NULL,
    PRIMARY KEY (key, matrix)
);

CREATE TABLE IF NOT EXISTS quant_errors (
    table_key       VARCHAR NOT NULL,     -- which table: model, init, rank, Fisher, settings
    model           VARCHAR NOT NULL,
    init            VARCHAR NOT NULL,     -- zero (quantize only) | loftq | lq
    matrix          VARCHAR NOT NULL,
    config          VARCHAR NOT NULL,
    b               INTEGER NOT NULL,
    b0              INTEGER NOT NULL,
    b1              VARCHAR NOT NULL,
    block_size      INTEGER NOT NULL,     -- the paper's B0: weights per block
    group_size      INTEGER NOT NULL,     -- the paper's B1: blocks per scale group
    rank            INTEGER NOT NULL,     -- 0: no low-rank part
    fisher          BOOLEAN NOT NULL,
    bits_per_param  DOUBLE NOT NULL,      -- storage incl. padding / numel
    storage_bits    BIGINT NOT NULL,
    numel           BIGINT NOT NULL,
    error           DOUBLE NOT NULL,      -- squared (Fisher-weighted) Frobenius error
    iters           INTEGER NOT NULL,
    seconds         DOUBLE NOT NULL,
    PRIMARY KEY (table_key, matrix, config)
);

CREATE TABLE IF NOT EXISTS plans (
    plan_id         VARCHAR PRIMARY KEY,
    model           VARCHAR NOT NULL,
    method          VARCHAR NOT NULL,
    budget          DOUBLE NOT NULL,      -- bits/param asked for
    table_key       VARCHAR NOT NULL,
    objective       DOUBLE NOT NULL,
    bound           DOUBLE NOT NULL,
    gap             DOUBLE NOT NULL,
    status          VARCHAR NOT NULL,
    solve_s         DOUBLE NOT NULL,
    bits_per_param  DOUBLE NOT NULL,      -- achieved, quantized part
    created_at      TIMESTAMP DEFAULT current_timestamp,
    budget_kind     VARCHAR,              -- what `budget` counts: quantized | lowrank (bits/param) | total (bytes)
    ranks           VARCHAR,              -- the ranks the plan chose from, e.g. '0,8,16,32,64'
    factor_bits     INTEGER,              -- bits per L1, L2 entry in the figures below
    bits_with_lowrank DOUBLE,             -- achieved, quantized part + factors, per target weight
    total_bytes     BIGINT                -- achieved, the whole model: + the tensors that are not targets
);

CREATE TABLE IF NOT EXISTS plan_assignments (
    plan_id         VARCHAR NOT NULL,
    matrix          VARCHAR NOT NULL,
    config          VARCHAR NOT NULL,
    b               INTEGER NOT NULL,
    b0              INTEGER NOT NULL,
    b1              VARCHAR NOT NULL,
    block_size      INTEGER NOT NULL,     -- the paper's B0: weights per block
    group_size      INTEGER NOT NULL,     -- the paper's B1: blocks per scale group
    bits_per_param  DOUBLE NOT NULL,
    error           DOUBLE NOT NULL,
    rank            INTEGER,              -- of the matrix's factors (0: none)
    PRIMARY KEY (plan_id, matrix)
);

CREATE TABLE IF NOT EXISTS decompositions (
    decomp_key  VARCHAR NOT NULL,
    plan_id     VARCHAR NOT NULL,
    model       VARCHAR NOT NULL,
    matrix      VARCHAR NOT NULL,
    config      VARCHAR NOT NULL,
    rank        INTEGER NOT NULL,
    error       DOUBLE NOT NULL,
    iters       INTEGER NOT NULL,
    seconds     DOUBLE NOT NULL,
    PRIMARY KEY (decomp_key, matrix)
);

CREATE TABLE IF NOT EXISTS train_steps (
    run      VARCHAR NOT NULL,            -- finetune key
    plan_id  VARCHAR NOT NULL,
    step     INTEGER NOT NULL,
    loss     DOUBLE NOT NULL,
    lr       DOUBLE NOT NULL,
    seconds  DOUBLE NOT NULL,
    val_loss DOUBLE,                      -- mean validation loss, on the steps that validated
    PRIMARY KEY (run, step)
);

CREATE TABLE IF NOT EXISTS evaluations (
    eval_key           VARCHAR PRIMARY KEY,
    model              VARCHAR NOT NULL,
    method             VARCHAR NOT NULL,  -- 'reference' for the unquantized model
    budget             DOUBLE,            -- NULL for the reference
    stage              VARCHAR NOT NULL,  -- reference | before_finetune | after_finetune
    metric             VARCHAR NOT NULL,  -- perplexity | response_perplexity | accuracy
    value              DOUBLE NOT NULL,
    perplexity         DOUBLE,
    bits_per_param     DOUBLE,            -- quantized part
    bits_incl_lowrank  DOUBLE,            -- plus 16-bit L1, L2
    peak_mb            DOUBLE,            -- memory loading + scoring this model added (MB; RSS or CUDA)
    n_tokens           BIGINT,
    seq_len            INTEGER,
    plan_id            VARCHAR,
    created_at         TIMESTAMP DEFAULT current_timestamp,
    macro_f1           DOUBLE,            -- classification
    dataset            VARCHAR,           -- the held-out data scored (dataset name and part)
    lr                 DOUBLE,            -- after_finetune: the peak learning rate of the adapter kept
    runtime            VARCHAR,           -- exported: what scored the file (llama.cpp | transformers)
    export_key         VARCHAR            -- exported: the export scored (exports)
);

-- One row per successful stage run (pipeline/stage_runs.py): wall time and memory.
CREATE TABLE IF NOT EXISTS stage_runs (
    model       VARCHAR NOT NULL,
    stage       VARCHAR NOT NULL,             -- asset name; error_table_chunk_N for the table's chunk ops
    device      VARCHAR NOT NULL,
    started_at  TIMESTAMP NOT NULL,
    seconds     DOUBLE NOT NULL,
    added_mb    DOUBLE NOT NULL,              -- peak minus what the process held at the start
    peak_mb     DOUBLE NOT NULL,              -- peak of the process (RSS) or of the CUDA allocator
    PRIMARY KEY (model, stage, started_at)
);

CREATE TABLE IF NOT EXISTS artifacts (
    path       VARCHAR PRIMARY KEY,
    asset      VARCHAR NOT NULL,
    partition  VARCHAR NOT NULL,
    key        VARCHAR NOT NULL,
    sha256     VARCHAR NOT NULL,          -- JSON {file: checksum}
    nbytes     BIGINT NOT NULL,
    created_at TIMESTAMP DEFAULT current_timestamp
);

-- One row per exported file or folder (pipeline/exporting.py): what it came from and holds.
CREATE TABLE IF NOT EXISTS exports (
    export_key        VARCHAR PRIMARY KEY,
    model             VARCHAR NOT NULL,
    method            VARCHAR NOT NULL,    -- 'reference': the uncompressed model with its LoRA
    budget            DOUBLE,              -- the method's budget (NULL for the reference)
    plan_id           VARCHAR NOT NULL,    -- the allocation plan of the base ('reference' for none)
    run_key           VARCHAR NOT NULL,    -- the finetuned adapter merged in
    format            VARCHAR NOT NULL,    -- gguf | hf | peft
    path              VARCHAR NOT NULL,    -- the artifact (file or folder) in the store
    file_bytes        BIGINT NOT NULL,     -- every file of it
    sha256            VARCHAR NOT NULL,    -- JSON {file: checksum}
    target_bits       DOUBLE,              -- gguf: bits per weight over the target matrices
    objective         DOUBLE,              -- gguf: Fisher-weighted error of the chosen types
    notes             VARCHAR,             -- what the converter said that a user should know
    created_at        TIMESTAMP DEFAULT current_timestamp
);

-- gguf exports: every tensor of the file, its llama.cpp type and size.
CREATE TABLE IF NOT EXISTS export_tensors (
    export_key  VARCHAR NOT NULL,
    tensor      VARCHAR NOT NULL,          -- the GGUF name (blk.N.attn_q.weight)
    type        VARCHAR NOT NULL,          -- Q4_K, IQ4_NL, F32, ...
    numel       BIGINT NOT NULL,
    nbytes      BIGINT NOT NULL,
    is_target   BOOLEAN NOT NULL,          -- chosen by the plan (else: the other-type knob, or F32)
    error       DOUBLE,                    -- targets: Fisher-weighted squared error of the type
    PRIMARY KEY (export_key, tensor)
);
