"""The data stage: a folder indexed into rows, images decoded and resized, pixel pipelines, the feature
cache and the loaders per phase."""
