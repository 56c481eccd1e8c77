"""Pictures: read, transformed, batched, and split into train/, val/ and test/."""
