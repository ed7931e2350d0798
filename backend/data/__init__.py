"""Data both training and scoring read: file checks and streaming parsers, records, token sequences, label words."""
