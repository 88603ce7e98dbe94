"""Datasets, datamodules and the synthetic-data generator; nothing here knows about models.

Import from the submodules (`cellcls.data.datamodule`, `cellcls.data.generate`), so that
`python -m cellcls.data.generate` runs without importing itself twice.
"""
