"""Training data: OpenFlamingo's preprocessing rules, webdataset pipelines, loader state."""
