"""Run history: the Parquet archive of ended runs' journals (`<home>/archive/`) and the analytics over
it. A library shared by the services and the CLI; it imports `shared`, never a service."""
