"""The environment variables a step may never give a plugin, whatever a manifest, an agent
or a secret says: one list, read by the reference agent when it runs a plugin and by the
orchestrator when a workflow is applied (official agents pass a step's variables as they
are). docs/plugins-environment.md."""

from __future__ import annotations

from dataclasses import dataclass

# The agent's own variables every plugin gets (with STAVILY_INSTRUCTION_ID).
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")


@dataclass(frozen=True)
class Refusal:
    """Variable names a step may never set, by exact name or prefix, and why.

    Names are compared in upper case: Windows reads them case-insensitively, and so do
    some programs everywhere (npm's `npm_config_*`)."""

    reason: str
    prefixes: tuple[str, ...] = ()
    names: frozenset[str] = frozenset()

    def matches(self, name: str) -> bool:
        upper = name.upper()
        return upper in self.names or upper.startswith(self.prefixes)


# What no manifest, agent option or secret can pass to a plugin. A step's variable goes to
# the plugin's process, and from there to every interpreter, loader, shell and tool it
# starts: any variable that makes one of those load or run code (or change whom it trusts)
# turns a workflow into a command on the agent's host. docs/plugins-environment.md.
REFUSED_ENVIRONMENT: tuple[Refusal, ...] = (
    Refusal(
        "the agent sets it, not the step",
        prefixes=("LC_", "STAVILY_"),
        names=frozenset(
            {*PASSED_ENV, "LANGUAGE", "TMP", "TEMP", "USERPROFILE", "WINDIR", "COMSPEC"}
        ),
    ),
    Refusal(
        "loader and interpreter variables are never passed to plugins",
        prefixes=(
            # dynamic loaders and the C library
            "LD_",
            "DYLD_",
            "MALLOC_",
            # interpreters and their package managers
            "PYTHON",
            "PERL",
            "RUBY",
            "GEM_",
            "BUNDLE_",
            "NODE_",
            "NPM_CONFIG_",
            "JAVA_",
            "_JAVA_",
            "JDK_",
            "LUA_",
            "DOTNET_",
            "CORECLR_",
            "COR_",
            # shells and the tools plugins commonly run
            "BASH_",
            "GIT_",
            "SSH_",
            "OPENSSL_",
            "XDG_",
        ),
        names=frozenset(
            {
                # loaders
                "GCONV_PATH",
                "LOCPATH",
                "NLSPATH",
                "GLIBC_TUNABLES",
                "LIBPATH",
                "SHLIB_PATH",
                # interpreters
                "CLASSPATH",
                "TCLLIBPATH",
                "PHPRC",
                "PHP_INI_SCAN_DIR",
                "R_PROFILE",
                "R_PROFILE_USER",
                "R_ENVIRON",
                "R_ENVIRON_USER",
                # shells
                "ENV",
                "SHELL",
                "SHELLOPTS",
                "BASHOPTS",
                "IFS",
                "PS1",
                "PS2",
                "PS3",
                "PS4",
                "PROMPT_COMMAND",
                "ZDOTDIR",
                "FPATH",
                "PATHEXT",
                # commands other programs start
                "BROWSER",
                "PAGER",
                "MANPAGER",
                "EDITOR",
                "VISUAL",
                "LESSOPEN",
                "LESSCLOSE",
                "SUDO_ASKPASS",
            }
        ),
    ),
    Refusal(
        "it decides which certificates the plugin trusts",
        prefixes=("SSL_CERT_",),
        names=frozenset({"REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"}),
    ),
)


def refusal(name: str) -> str | None:
    """Why a step may never set the variable `name`, or None when it may be allowed."""
    for rule in REFUSED_ENVIRONMENT:
        if rule.matches(name):
            return rule.reason
    return None
