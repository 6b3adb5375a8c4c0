"""The reference agent (`stavily agent run`), speaking exactly the public agent API."""
