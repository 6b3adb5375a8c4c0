"""HTTP only: the public agent API, the private API, thin handlers over the domain."""
