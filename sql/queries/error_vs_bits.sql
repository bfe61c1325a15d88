-- The error-vs-bits curve: total error of each config over all matrices, per table
-- (init x rank x Fisher), cheapest first. Relative error is against the same table's
-- best config, so curves of different tables can be compared.
WITH per_config AS (
    SELECT table_key, init, rank, fisher, config, b, b0, b1, block_size, group_size,
           sum(storage_bits) / sum(numel) AS bits_per_param,
           sum(error)                     AS total_error,
           count(*)                       AS matrices
    FROM quant_errors
    WHERE model = $model
    GROUP BY ALL
)
SELECT init, rank, fisher, config, round(bits_per_param, 4) AS bits_per_param, total_error,
       round(total_error / min(total_error) OVER (PARTITION BY table_key), 4) AS relative_error, matrices
FROM per_config
ORDER BY init, rank, fisher, bits_per_param, total_error;
