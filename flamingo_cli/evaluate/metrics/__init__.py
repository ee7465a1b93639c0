"""Few-shot scores: CIDEr for captions, VQA accuracy, OK-VQA stemming (docs/formats.md §13).

Pure functions over predictions and references; no torch, no printing. `eval-fewshot` calls
them on rank 0 after gathering every rank's predictions.
"""
