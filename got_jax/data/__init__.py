"""GoT data: annotation records and readers, TFDS builders, the Grain input pipeline, synthetic shapes."""
