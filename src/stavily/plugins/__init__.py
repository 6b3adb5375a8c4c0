"""The plugin registry: manifests, artifacts, signing, storage, versions and installs."""
