"""The chaos run (``make chaos``): sagas on real workers while workers and Redis are killed."""
