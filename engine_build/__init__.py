"""The build stage behind `dgemma build`: calibrate, quantize with ModelOpt, export, verify, write the manifest.

Nothing under `service/` imports this package (only `dgemma build`, lazily). A build directory is a Hugging Face
checkpoint plus `verify.json` and `manifest.json` (service/model/build_manifest.py); docs/build.md explains it.
"""
