# Packages for KVM hosts, into dist/. The version lives in pyproject.toml only.
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
DEB_REVISION ?= 1
RPM_RELEASE ?= 1
# Debian's build tools run on Debian's python3, never a pyenv or venv shim.
SYSTEM_ENV := env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8
# Each package builds in its own corner of build/, so the two never collide.
DEB_STAGE := build/deb/kvmhook-$(VERSION)
RPM_STAGE := build/rpm

# The source tree without VCS, build and cache files, copied into $(1).
define copy_tree
	rm -rf $(1) && mkdir -p $(1) dist
	tar -c --exclude-vcs --exclude=./build --exclude=./dist --exclude=./.venv \
	    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache \
	    --exclude=.ruff_cache --exclude=.hypothesis . | tar -x -C $(1)
endef

.PHONY: deb rpm clean

deb:
	$(call copy_tree,$(DEB_STAGE))
	cp -r packaging/deb/debian $(DEB_STAGE)/debian
	printf '%s\n' "kvmhook ($(VERSION)-$(DEB_REVISION)) unstable; urgency=medium" "" \
	    "  * Built from the kvmhook source tree." "" \
	    " -- kvmhook maintainers <maintainers@kvmhook.invalid>  $$(date -R)" \
	    > $(DEB_STAGE)/debian/changelog
	cd $(DEB_STAGE) && $(SYSTEM_ENV) dpkg-buildpackage -b -us -uc
	mv build/deb/kvmhook_$(VERSION)-$(DEB_REVISION)_all.deb dist/

rpm:
	$(call copy_tree,$(RPM_STAGE)/kvmhook-$(VERSION))
	tar -czf $(RPM_STAGE)/kvmhook-$(VERSION).tar.gz -C $(RPM_STAGE) kvmhook-$(VERSION)
	$(SYSTEM_ENV) rpmbuild -bb --nodeps \
	    --define "_topdir $(CURDIR)/$(RPM_STAGE)/rpmbuild" --define "_sourcedir $(CURDIR)/$(RPM_STAGE)" \
	    --define "_rpmdir $(CURDIR)/dist" --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
	    --define "kvmhook_version $(VERSION)" --define "kvmhook_release $(RPM_RELEASE)" \
	    packaging/rpm/kvmhook.spec

clean:
	rm -rf build dist
