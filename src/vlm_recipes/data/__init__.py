"""A run's data: rows from a task's files, their images, and the splits as datasets. Import from the module that
holds a name:

- `errors`: `DataError` and `BadRow`, what the data modules raise;
- `images`: image headers, decoding to RGB, the pixel limit (`resolve_image`, `load_rgb_image`);
- `rows`: reading data files, the bad-row policy (`BadRowReport`), `build_dataset`;
- `formats`: the formats of `dataset_name` datasets (TRL messages and prompt-completion, LLaVA, ShareGPT);
- `hub`: `dataset_name` datasets read through `datasets` (hub, local folders, data files; map-style or streamed);
- `splits`: a recipe's splits loaded through its task or from `dataset_name` (`load_splits`).

Images are checked twice, so that no image stops a run with a PIL traceback:
- at load time, `resolve_image` reads each image's header (size and mode, no pixels): a missing, empty or non-image
  file, or one over `max_image_pixels`, is a bad row of its data file (error | skip);
- when pixels are decoded (a truncated file is found only then), the dataset's transform records the failure in the
  example's `image_error` instead of raising, and the collator applies the same policy to it.
"""
