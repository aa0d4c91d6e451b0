"""Print deb-src entries (deb822) for the machine's own configured Debian archive.

scripts/setup.sh fetches lwIP's source with `apt-get source` through a temporary apt
configuration; its deb-src entries come from here, made from the `deb` entries this machine
already uses (/etc/apt/sources.list, /etc/apt/sources.list.d/*.list and *.sources), so that a
machine behind a local mirror or a proxy fetches from the same place as for its binaries, and
the repository names no host.  Only entries for this release (its codename, or codename-*
such as -updates and -security) with the "main" component are kept: third-party repositories
seldom publish sources.

    python3 scripts/debsrc.py [--codename bookworm] [--root /]
"""
import argparse
import glob
import os
import sys


def parse_one_line(text):
    """Entries of the one-line format: `deb [opt=value ...] uri suite [component...]`."""
    entries = []
    for line in text.splitlines():
        line = line.split('#', 1)[0].strip()
        if not line:
            continue
        words = line.split()
        kind, words = words[0], words[1:]
        options = {}
        if words and words[0].startswith('['):
            # Options may be split over several words: "[ arch=amd64 signed-by=/k.gpg ]".
            opts = []
            while words:
                word = words.pop(0)
                opts.append(word)
                if word.endswith(']'):
                    break
            for opt in ' '.join(opts).strip('[] ').split():
                key, _, value = opt.partition('=')
                options[key.lower()] = value
        if kind not in ('deb', 'deb-src') or len(words) < 2:
            continue
        entries.append({'types': [kind], 'uris': [words[0]], 'suites': [words[1]],
                        'components': words[2:], 'options': options})
    return entries


def parse_deb822(text):
    """Entries of the deb822 format (.sources files): stanzas of `Field: value` lines, where
    a line that starts with a space continues the field before it (as Signed-By's inline keys)."""
    entries = []
    for stanza in _stanzas(text):
        fields = {}
        key = None
        for line in stanza:
            if line[:1] in (' ', '\t') and key:
                fields[key] += '\n' + line
            elif ':' in line:
                key, _, value = line.partition(':')
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get('enabled', 'yes').lower() == 'no' or 'types' not in fields:
            continue
        options = {k: v for k, v in fields.items()
                   if k not in ('types', 'uris', 'suites', 'components', 'enabled')}
        entries.append({'types': fields['types'].split(), 'uris': fields.get('uris', '').split(),
                        'suites': fields.get('suites', '').split(),
                        'components': fields.get('components', '').split(),
                        'options': options})
    return entries


def _stanzas(text):
    stanza = []
    for line in text.splitlines():
        if line.startswith('#'):
            continue
        if not line.strip():
            if stanza:
                yield stanza
            stanza = []
        else:
            stanza.append(line)
    if stanza:
        yield stanza


def read_sources(root='/'):
    """Every entry configured under root's /etc/apt."""
    etc = os.path.join(root, 'etc', 'apt')
    entries = []
    for path in [os.path.join(etc, 'sources.list')] + sorted(
            glob.glob(os.path.join(etc, 'sources.list.d', '*.list'))):
        if os.path.exists(path):
            with open(path) as f:
                entries += parse_one_line(f.read())
    for path in sorted(glob.glob(os.path.join(etc, 'sources.list.d', '*.sources'))):
        with open(path) as f:
            entries += parse_deb822(f.read())
    return entries


# The options that carry over to a deb-src entry (the one-line names; deb822 uses the same).
KEPT_OPTIONS = ('signed-by', 'trusted', 'check-valid-until', 'check-date', 'allow-insecure',
                'allow-weak', 'allow-downgrade-to-insecure', 'by-hash', 'inrelease-path')


def deb_src_entries(entries, codename):
    """deb822 stanzas (text) of deb-src entries for this release's main component, one per
    archive and suite, in the order configured."""
    seen = set()
    stanzas = []
    for entry in entries:
        if 'deb' not in entry['types'] or 'main' not in entry['components']:
            continue
        for uri in entry['uris']:
            for suite in entry['suites']:
                if suite != codename and not suite.startswith(codename + '-'):
                    continue
                if (uri, suite) in seen:
                    continue
                seen.add((uri, suite))
                lines = ['Types: deb-src', f'URIs: {uri}', f'Suites: {suite}', 'Components: main']
                for key in KEPT_OPTIONS:
                    value = entry['options'].get(key)
                    if value:
                        name = '-'.join(w.capitalize() for w in key.split('-'))
                        lines.append(f'{name}: {value}')
                stanzas.append('\n'.join(lines))
    return stanzas


def codename_of(root='/'):
    try:
        with open(os.path.join(root, 'etc', 'os-release')) as f:
            for line in f:
                key, _, value = line.strip().partition('=')
                if key == 'VERSION_CODENAME':
                    return value.strip('"\'')
    except OSError:
        pass
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--root', default='/', help='the file system whose /etc/apt to read')
    parser.add_argument('--codename', help="the release (default: /etc/os-release's)")
    opts = parser.parse_args(argv)
    codename = opts.codename or codename_of(opts.root)
    if not codename:
        print('debsrc: no VERSION_CODENAME in /etc/os-release; give --codename', file=sys.stderr)
        return 2
    stanzas = deb_src_entries(read_sources(opts.root), codename)
    if not stanzas:
        print(f'debsrc: no configured apt source for {codename} main (in /etc/apt/sources.list '
              f'or /etc/apt/sources.list.d/): cannot fetch source packages', file=sys.stderr)
        return 1
    print('\n\n'.join(stanzas))
    return 0


if __name__ == '__main__':
    sys.exit(main())
