"""The subsystems common.py re-exports: models, problems, sampling, run folders. None of them imports common."""
