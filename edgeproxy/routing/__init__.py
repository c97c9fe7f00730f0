"""Where a request can go and which way is best: egress lines and paths (lines), probes
(probe), RTT estimation (estimator), passive health (health), the pure selector (select),
the retry budget (budget), and the State built from one config (state). Imports net, proto,
config; never the engine or a filter."""
