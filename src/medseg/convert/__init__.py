"""The convert stage, one module per job: `dataset` (the stage: every case, the manifest,
the atomic output), `case` (one case, in a worker process), `ids` (case ids and their checks),
`pseudonyms` (keyed-hash ids, the key file, messages without names)."""
