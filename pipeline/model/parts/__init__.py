"""Model parts. Each module registers its parts with `pipeline.model.registry.register`."""
