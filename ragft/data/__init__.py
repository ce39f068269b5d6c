"""Training data: rows (read + validate) → tokenize (ids + loss mask) → pack (rows, batches) → prepare (cached, on the driver)."""
