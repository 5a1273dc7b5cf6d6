"""Datasets: the loaders of Cityscapes, KITTI (raw video, 2015 semantics, the Eigen depth split) and the embedded
synthetic data (``synthetic``), their common base classes (``base``), the prepared cache (``cache``, written by
``cache_writer``), sampling over epochs and ranks (``sampling``), augmentation on the device (``augment``), the
label table (``labels``) and the class-weight statistics (``stats``)."""
