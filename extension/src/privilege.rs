//! Whose rights the extension's own look-ups run with. Publishers seal with a key and insert
//! into segments that their roles cannot read: those reads run as the table's owner, in a
//! security-restricted operation, as a SECURITY DEFINER function would.

use pgrx::pg_sys;

/// Runs `f` as `user` in a security-restricted operation, as SECURITY DEFINER functions and
/// foreign-key checks run, with `search_path` pinned to `pg_catalog, pg_temp`, so that no
/// function or operator of the caller's schemas can be picked up with `user`'s rights. An error
/// inside restores the caller's identity and settings as the (sub)transaction aborts.
pub fn as_user<R>(user: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let mut caller = pg_sys::Oid::INVALID;
    let mut context = 0;
    // SAFETY: saving and switching the current user, then a GUC nesting level of our own, set
    // as fmgr_security_definer does; both undone below.
    let nest_level = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut caller, &mut context);
        pg_sys::SetUserIdAndSecContext(
            user,
            context
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
        let level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        level
    };
    let result = f();
    // SAFETY: pops the level pushed above, then restores what was saved.
    unsafe {
        pg_sys::AtEOXact_GUC(true, nest_level);
        pg_sys::SetUserIdAndSecContext(caller, context);
    }
    result
}

/// The owner of relation `relid`, whose rights the extension's look-ups run with.
pub fn owner(relid: pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: a relcache look-up and its release; the field read is a plain value.
    unsafe {
        let relation = pg_sys::RelationIdGetRelation(relid);
        if relation.is_null() {
            pgrx::error!("pg_outbox: relation {relid:?} does not exist");
        }
        let owner = (*(*relation).rd_rel).relowner;
        pg_sys::RelationClose(relation);
        owner
    }
}
