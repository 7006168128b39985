"""Enrollment: a downstream cluster's keys stay home.

A downstream agent (``atlasd agent``) makes its private keys itself and sends only
certificate signing requests; atlasd signs them with the current CA. The first request
is authenticated by a one-time join token (``token``), renewals by the current client
certificate (mTLS). ``csr`` checks what is asked for, ``store`` keeps the token records
in the API, ``wire`` is the small HTTP/1.1-over-TLS both sides speak, ``endpoint`` is the
daemon's subsystem and ``agent`` the downstream side. docs/security.md, "Enrollment".
"""
