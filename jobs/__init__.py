"""Spark batch jobs: each has run(spark, paths, start, end, cfg) and a thin main()."""
