-- For each layer type (q_proj, down_proj, ...) and bit width b: the scale storage
-- (b0, b1, block_size, group_size) with the least total error over matrices of that type, and what it
-- costs. Answers "which block sizes should I use for my MLP at 3 bits?".
WITH per_kind AS (
    SELECT e.init, e.rank, e.fisher, m.kind, e.b, e.config, e.b0, e.b1, e.block_size, e.group_size,
           sum(e.storage_bits) / sum(e.numel) AS bits_per_param,
           sum(e.error)                       AS total_error
    FROM quant_errors e JOIN matrices m ON m.model = e.model AND m.name = e.matrix
    WHERE e.model = $model
    GROUP BY ALL
)
SELECT init, rank, fisher, kind, b, config, round(bits_per_param, 4) AS bits_per_param, total_error
FROM per_kind
QUALIFY row_number() OVER (PARTITION BY init, rank, fisher, kind, b ORDER BY total_error) = 1
ORDER BY init, rank, fisher, kind, b;
