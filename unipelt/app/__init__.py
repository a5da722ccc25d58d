"""unipelt-train, unipelt-report: the Hydra app (schemas, tracking, results, report) above unipelt.train."""
