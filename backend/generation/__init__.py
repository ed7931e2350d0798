"""The generation engine: one loop over any runner, the samplers and their presets, fill-mask."""
