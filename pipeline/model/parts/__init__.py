"""Model parts, one module each. Every module here is imported by pipeline.model.registry (found by
listing this package) and declares its parts (`register`), their settings (`settings`) and the roles
of the parameters they create (pipeline.model.roles); see registry's docstring for the recipe."""
