"""Datasets: the synthetic generator, the Karpathy reader, download, caption cleaning and
tokenisation, preprocess, and the memory-mapped :class:`PairDataset`.

Submodules are imported on use (``from dmp_core.data.preprocess import run_preprocess``)
so that importing this package stays cheap."""
