"""The runtime: the worker, the step loop, built-in host functions, the watchdog, telemetry."""
