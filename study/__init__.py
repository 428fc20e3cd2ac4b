"""The study behind reproduce.py: its plan (plan.py), the job runner (jobs.py), and the
paper's tables and figures (tables.py, figures.py)."""
