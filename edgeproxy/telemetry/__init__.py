"""What edgeproxy tells operators: Prometheus metrics (metrics), the access log (accesslog) and
the process log (processlog), both written through a sink that never blocks (sink). Leaves: they
import nothing else of edgeproxy."""
