"""The API key every test server accepts as admin, and the header that carries it."""

from __future__ import annotations

#: Registered at start through FORGELINE_ADMIN_KEY (a well-formed, fixed test key).
ADMIN_KEY = "fl_7e57ab1e_" + "t" * 43
#: The keyed hash's key on every test server, so replicas agree.
SECRET_KEY = "test-secret-key-for-api-key-hashes"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
