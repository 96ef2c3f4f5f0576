"""Running the pipeline: `repro` (stages at once), the cost estimate, profile switching."""
