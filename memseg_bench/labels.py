"""The label id of pixels that belong to no class: borders, void, padding. Losses, the memory bank,
metrics and the data checks skip it."""

IGNORE = 255
