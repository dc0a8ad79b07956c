"""Operations: applying workflows, status, traces, health, the embedded server and cluster."""
