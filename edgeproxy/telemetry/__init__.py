"""What edgeproxy tells operators: Prometheus metrics (metrics) and the access log
(accesslog). Leaves: they import nothing else of edgeproxy."""
