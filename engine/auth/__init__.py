"""Who may call the gateway and how much: API keys (keystore), JWTs (jwtauth), limits per caller
(limits, limiter) and the usage ledger, put together by gate.Gate. docs/gateway.md, "Auth and limits"."""
