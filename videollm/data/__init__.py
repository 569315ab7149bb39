"""The data layer: the synthetic video generator, haystacks, instruction-data formats, video
sources for encoder training and the prompt templates, one definition each.

It sits above `videollm` (the model) and below `eval` and `training`, which both read from it.
"""
