"""The pure core: saga state, the state machine, retry delays, configuration. No I/O."""
