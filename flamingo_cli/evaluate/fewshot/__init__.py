"""Few-shot benchmarks (`flamingo eval-fewshot`): the datasets as they ship, OpenFlamingo's
protocol (docs/formats.md §14), the runner that generates on every rank and scores on rank 0."""
