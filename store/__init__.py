"""The store floor: a chunked Zarr store of teacher targets, its manifest and records."""
