# shellcheck shell=bash
# A private apt state for downloading packages of another Debian suite (backports, trixie, sid) without
# touching the system's apt state and without writing a mirror's host name anywhere: the sources are
# derived at run time from the system's own. Sourced (bash) by tests/e2e/vm/prepare.sh and
# tests/e2e/containerd/fetch-containerd.sh.
#
#   debian_apt_setup DIR BASE_SUITE SUITE   private apt dir DIR with one source: the system's stanza for
#                                           BASE_SUITE (e.g. bookworm) with Suites: SUITE; sets apt_args
#   debian_apt_update                       apt-get update of that source only
#   (then: apt-get "${apt_args[@]}" download PKG/SUITE, apt-cache "${apt_args[@]}" depends PKG/SUITE)

# debian_source_for BASE_SUITE SUITE: the system's apt source for BASE_SUITE rewritten to SUITE (deb822).
debian_source_for() {
    local base=$1 suite=$2 f=/etc/apt/sources.list.d/debian.sources
    if [[ -r $f ]]; then
        awk -v base="$base" -v suite="$suite" '
            BEGIN { RS = ""; FS = "\n" }
            {
                hit = 0; out = ""
                for (i = 1; i <= NF; i++) {
                    line = $i
                    if (line ~ /^#/) continue
                    if (line ~ /^Suites:/) {
                        n = split(substr(line, 8), s, /[ \t]+/)
                        for (j = 1; j <= n; j++) if (s[j] == base) hit = 1
                        line = "Suites: " suite
                    }
                    out = out line "\n"
                }
                if (hit && !done) { printf "%s", out; done = 1 }
            }' "$f"
        return 0
    fi
    # Fallback: one-line format in /etc/apt/sources.list ("deb [options] URI SUITE COMPONENTS...").
    sed -e 's/\[[^]]*\]//' /etc/apt/sources.list 2>/dev/null |
        awk -v base="$base" -v suite="$suite" '$1 == "deb" && $3 == base && !done {
            print "Types: deb"; print "URIs: " $2; print "Suites: " suite; print "Components: main"
            done = 1
        }' || true
}

# debian_apt_setup DIR BASE_SUITE SUITE: writes DIR/{sources,apt.conf,...}; sets the array apt_args
# (declare it local in the caller to keep it there). Returns 1 if the system has no source for BASE_SUITE.
debian_apt_setup() {
    local dir=$1 base=$2 suite=$3 src
    mkdir -p "$dir/sources" "$dir/preferences" "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/debs"
    src=$(debian_source_for "$base" "$suite")
    [[ -n $src ]] || {
        echo "debian-apt: no apt source for suite '$base' in the system's apt sources" >&2
        return 1
    }
    rm -f "$dir"/sources/*.sources
    printf '%s\n' "$src" >"$dir/sources/$suite.sources"
    # Private configuration on top of the system's: no system hooks (they act on the system's apt state),
    # no translation / AppStream indexes (not needed to download one package).
    {
        echo '#clear APT::Update::Pre-Invoke;'
        echo '#clear APT::Update::Post-Invoke;'
        echo '#clear APT::Update::Post-Invoke-Success;'
        echo '#clear DPkg::Pre-Invoke;'
        echo '#clear DPkg::Post-Invoke;'
        echo 'Acquire::Languages "none";'
        echo 'Acquire::IndexTargets::deb::DEP-11::DefaultEnabled "false";'
        if ((EUID == 0)); then echo 'APT::Sandbox::User "root";'; fi
    } >"$dir/apt.conf"
    apt_args=(
        -c "$dir/apt.conf"
        -o Dir::Etc::SourceList=/dev/null
        -o "Dir::Etc::SourceParts=$dir/sources"
        -o "Dir::Etc::PreferencesParts=$dir/preferences"
        -o "Dir::State::Lists=$dir/lists"
        -o "Dir::Cache=$dir/cache"
    )
}

# debian_apt_update: apt-get update of the private source (output to stderr).
debian_apt_update() {
    apt-get "${apt_args[@]}" -q update >&2
}
