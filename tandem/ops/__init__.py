"""Running the platform: the MLflow registry (bundle = model version, aliases) and its pyfunc
face, the MLflow/redis/Airflow processes, the argument-list Airflow operator and the DAGs'
operators, detached processes, the recommender's client channel and the jobs' shared command line.

May import: the foundation (``tandem.config``, ``schema``, ``validation``, ``security``) and
``tandem.models`` (the registry registers bundles).
"""
