"""The upstream HTTP/1.1 client: one protocol object per connection on httptools (client,
waits), a keep-alive pool per path (pool), HTTP CONNECT and SOCKS5 tunnels (tunnel), cached
DNS (dns). Knows nothing of upstreams, lines or requests beyond the bytes it is handed."""
