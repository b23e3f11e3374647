"""IV-Edit evaluation: dataset, generation (RePlan and baselines), VLM judges, scoring, fidelity metrics, reports."""
